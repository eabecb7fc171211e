"""Running many engine replicas behind one endpoint: routing (and, with Ray Serve, deployment)."""
