"""Batch scoring: read, check, score and write datasets in parts that survive a crash."""
