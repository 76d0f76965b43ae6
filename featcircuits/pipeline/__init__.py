"""The whole pipeline in one call (``run_demo``) and its HTML report; ``featcircuits demo`` runs it."""

from .demo import DemoResult, run_demo

__all__ = ["run_demo", "DemoResult"]
