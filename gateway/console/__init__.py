"""The operator's web console under /console: usage and cost, the catalog, live health, refusals."""
