"""Task functions for the chaos test (importable by worker processes)."""

import time


def leaf(i):
    time.sleep(0.002)
    return i * i % 7


def combine(a, b):
    time.sleep(0.002)
    return a + b
