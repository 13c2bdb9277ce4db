"""Trains the iris LogisticRegression and pickles it to the path given."""
import pickle
import sys

from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

X, y = load_iris(return_X_y=True)
model = LogisticRegression(max_iter=1000).fit(X, y)
with open(sys.argv[1], "wb") as f:
    pickle.dump(model, f)
