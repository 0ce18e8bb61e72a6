"""Imported last by the children's forkserver (its preload list; see :func:`processes._context`),
never elsewhere: the server starts with SIGINT blocked, so that a Ctrl-C during its imports waits
instead of printing their traceback. With the imports done, a Ctrl-C that waited is dropped and SIGINT
unblocked again, so every process the server forks later (a user's as well as landscape's) starts
able to receive Ctrl-C."""
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)  # a pending Ctrl-C is discarded as its handler becomes SIG_IGN
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)  # what the server's children start with
