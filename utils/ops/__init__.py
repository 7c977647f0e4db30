"""Computations that know nothing of the rest: boxes, NMS, metrics, image geometry, drawing."""
