"""One module per ``featcircuits`` sub-command (see ``featcircuits.cli``)."""
