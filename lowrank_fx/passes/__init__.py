"""Graph passes. One pass per file; each takes a GraphModule and returns what it changed."""
