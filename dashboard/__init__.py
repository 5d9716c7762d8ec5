"""The live dashboard (Dash): reads PostgreSQL and the object store, never Kafka. `sqis dashboard`."""
