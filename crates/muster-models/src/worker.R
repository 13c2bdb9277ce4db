# muster's R model worker. muster writes this file into each R environment; do not edit it.
#
# Started by a muster pool as
#
#     Rscript --vanilla muster_worker.R IN_FD OUT_FD BUNDLE_DIR ENTRY_FILE
#
# it sources ENTRY_FILE (relative to BUNDLE_DIR, the working directory) once, into its own
# environment, and answers calls of the execute(data) it defines, one at a time: requests come
# on the pipe at file descriptor IN_FD, answers go to the one at OUT_FD. Every message is a
# frame: a 4-byte big-endian length, then that many bytes (the same protocol as the Python
# worker's):
#
#     worker -> pool, once:  "R" + JSON {"pid": N}            the model is loaded
#                            "F" + JSON {"type", "message"}   it failed to load (the worker exits)
#     pool -> worker:        the JSON of `data`, read with jsonlite::fromJSON (records become a
#                            data.frame, columns a named list, rows a matrix)
#     worker -> pool:        "O" + the JSON of execute's result (jsonlite::toJSON)
#                            "E" + JSON {"type", "message"}   execute signalled an error
#
# stdout and stderr go to the model's log. The worker ends when the request pipe closes.

suppressPackageStartupMessages(library(jsonlite))

args <- commandArgs(trailingOnly = TRUE)
inp <- file(paste0("/dev/fd/", args[[1]]), open = "rb")
out <- file(paste0("/dev/fd/", args[[2]]), open = "wb")
bundle_dir <- args[[3]]
entry_file <- args[[4]]

send <- function(kind, payload) {
  body <- charToRaw(enc2utf8(payload))
  writeBin(as.integer(length(body) + 1L), out, size = 4L, endian = "big")
  writeBin(c(charToRaw(kind), body), out)
  flush(out)
}

error_json <- function(e) {
  msg <- conditionMessage(e)
  if (nchar(msg) > 2000L) msg <- paste0(substr(msg, 1L, 2000L), "...")
  kind <- class(e)[[1]]
  if (kind %in% c("simpleError", "error")) kind <- "Error"
  as.character(toJSON(list(type = kind, message = msg), auto_unbox = TRUE))
}

read_exactly <- function(n) {
  got <- raw(0)
  while (length(got) < n) {
    part <- readBin(inp, "raw", n - length(got))
    if (length(part) == 0L) return(NULL)
    got <- c(got, part)
  }
  got
}

jsonable <- function(x) {
  # A named vector (what predict() returns) as a plain list of values.
  if (is.atomic(x) && !is.null(names(x)) && is.null(dim(x))) x <- unname(x)
  if (is.factor(x)) x <- as.character(x)
  x
}

model <- new.env()
loaded <- tryCatch({
  setwd(bundle_dir)
  sys.source(entry_file, envir = model, chdir = TRUE)
  if (!exists("execute", envir = model, inherits = FALSE) ||
      !is.function(get("execute", envir = model))) {
    stop(sprintf("%s defines no function execute(data)", entry_file))
  }
  TRUE
}, error = function(e) {
  message("loading the model: ", conditionMessage(e))
  send("F", error_json(e))
  FALSE
})
if (!loaded) quit(save = "no", status = 1)
execute <- get("execute", envir = model)
send("R", as.character(toJSON(list(pid = Sys.getpid()), auto_unbox = TRUE)))

repeat {
  head <- read_exactly(4L)
  if (is.null(head)) break
  n <- readBin(head, "integer", size = 4L, endian = "big")
  body <- if (n > 0L) read_exactly(n) else raw(0)
  if (is.null(body)) break
  answer <- tryCatch({
    data <- fromJSON(rawToChar(body), simplifyVector = TRUE)
    result <- execute(data)
    result <- jsonable(result)
    # A vector is always a JSON list (one prediction per row, even for one row); in lists,
    # single values are plain.
    list("O", as.character(toJSON(result, auto_unbox = !is.atomic(result), digits = NA,
                                  na = "null", null = "null", dataframe = "rows")))
  }, error = function(e) {
    message("execute: ", conditionMessage(e))
    if (!is.null(conditionCall(e))) message("  in ", deparse(conditionCall(e))[[1]])
    list("E", error_json(e))
  })
  send(answer[[1]], answer[[2]])
}
