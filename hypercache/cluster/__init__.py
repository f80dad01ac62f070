"""Cluster node: ring, replication, membership, convergence and their configuration."""
