"""The iris model of muster-models' tests and bench: a LogisticRegression pickled by train.py,
plus a few test behaviours asked for with {"test": ...}."""
import os
import pickle
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class IrisModel:
    def __init__(self):
        with open(os.path.join(HERE, "model.pkl"), "rb") as f:
            self.model = pickle.load(f)

    def execute(self, data):
        if isinstance(data, dict) and "test" in data:
            return self.test(data)
        return self.model.predict(data).tolist()

    def test(self, d):
        t = d["test"]
        if t == "raise":
            raise ValueError(d.get("message", "bad input"))
        if t == "sleep":
            if "mark" in d:
                open(os.path.join(d["mark"], str(os.getpid())), "w").close()
            time.sleep(d["seconds"])
            return os.getpid()
        if t == "exit":
            os._exit(3)
        if t == "numpy":
            import numpy as np

            return {"a": np.arange(3), "f": np.float32(1.5), "nan": float("nan"),
                    "p": self.model.predict_proba([[5.1, 3.5, 1.4, 0.2]])[0]}
        return os.getpid()
