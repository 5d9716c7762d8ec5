"""The HTTP door (issue #20): uploads to the frames topic, synchronous inspection, reads from PostgreSQL.

Needs the ``api`` extra (fastapi, uvicorn, python-multipart): ``pip install 'sqis[api]'``.
"""
