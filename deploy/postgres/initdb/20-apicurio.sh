#!/bin/sh
# First start of the PostgreSQL container: the schema registry's database (Apicurio creates its
# tables itself). The local stack does the same in infra/stack.py (_registry_db).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE apicurio OWNER "$POSTGRES_USER";
SQL
