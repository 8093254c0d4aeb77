"""Experiments built on jaxrlhf: one package per experiment, each a set of runnable stage scripts."""
