#!/bin/sh
# First start of the PostgreSQL container: a second database for the MLflow tracking server.
# The sqis schema itself is created by `sqis db migrate` (the db-migrate service), not here.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE mlflow OWNER "$POSTGRES_USER";
SQL
