"""Exact linear attribution graphs over sparse dictionary features (ReplacementModel, build_graph, ...)."""
