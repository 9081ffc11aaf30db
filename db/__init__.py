"""Storage: SQLAlchemy schema, connections, and the reads and writes cfb needs.

Only this layer and the CLI see raw (external) ids; everything below works on inner indices.
"""
