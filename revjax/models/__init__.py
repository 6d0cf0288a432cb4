"""Reference models built on revjax."""
