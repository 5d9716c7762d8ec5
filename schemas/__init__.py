"""The contracts of the system: Avro schemas, the topic catalog and serde.

This package imports nothing else of the project; every other package may import it.
"""

from schemas.catalog import TOPICS, Topic, TopicCatalog
from schemas.serde import SchemaError, Serde, deserialize, serialize

__all__ = ["TOPICS", "Topic", "TopicCatalog", "SchemaError", "Serde", "serialize", "deserialize"]
