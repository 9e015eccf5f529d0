"""The tools around the method: the ``jras`` command line, the simulation launcher, the
localhost deployment, process handling and the deployment PKI."""
