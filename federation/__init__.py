"""The federation protocol between the coordinator's server and the sites."""
