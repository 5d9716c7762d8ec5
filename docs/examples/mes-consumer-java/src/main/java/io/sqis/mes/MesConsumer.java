package io.sqis.mes;

import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ConcurrentHashMap;

import org.apache.avro.Schema;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.DecoderFactory;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.StringDeserializer;

/**
 * Reads result topics with stock libraries only: kafka-clients (read_committed) and Apache Avro.
 * Each value is in the Confluent wire format: byte 0 = 0, bytes 1-4 = schema id (big-endian), then
 * Avro binary. The writer schema is fetched once per id from the registry
 * (GET {registry}/schemas/ids/{id}, the Confluent API, served by Apicurio under /apis/ccompat/v7).
 * Prints one tab-separated line per record: topic, key, ce_type, ce_id, the record as JSON.
 *
 * Usage: MesConsumer BOOTSTRAP REGISTRY_URL GROUP MAX_RECORDS TOPIC [TOPIC...]
 */
public final class MesConsumer {
    private static final HttpClient HTTP = HttpClient.newHttpClient();
    private static final Map<Integer, Schema> SCHEMAS = new ConcurrentHashMap<>();

    public static void main(String[] args) throws Exception {
        if (args.length < 5) {
            System.err.println("usage: MesConsumer BOOTSTRAP REGISTRY_URL GROUP MAX_RECORDS TOPIC...");
            System.exit(2);
        }
        String registry = args[1];
        Properties p = new Properties();
        p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        p.put(ConsumerConfig.GROUP_ID_CONFIG, args[2]);
        p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");  // committed results only
        p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        int max = Integer.parseInt(args[3]);
        List<String> topics = List.of(args).subList(4, args.length);
        int seen = 0;
        long deadline = System.currentTimeMillis() + 60_000;
        try (KafkaConsumer<String, byte[]> consumer = new KafkaConsumer<>(p)) {
            consumer.subscribe(topics);
            while (seen < max && System.currentTimeMillis() < deadline) {
                for (ConsumerRecord<String, byte[]> r : consumer.poll(Duration.ofMillis(500))) {
                    GenericRecord value = decode(registry, r.value());
                    System.out.println(r.topic() + "\t" + r.key() + "\t" + header(r, "ce_type") + "\t"
                            + header(r, "ce_id") + "\t" + value);
                    seen++;
                }
            }
            consumer.commitSync();  // after the records are handled: at-least-once, dedupe by the key field
        }
        System.exit(seen >= max ? 0 : 1);
    }

    static GenericRecord decode(String registry, byte[] payload) throws Exception {
        ByteBuffer buf = ByteBuffer.wrap(payload);
        if (payload.length < 5 || buf.get() != 0) {
            throw new IllegalArgumentException("not in the Confluent wire format (magic byte 0)");
        }
        int id = buf.getInt();
        Schema writer = SCHEMAS.get(id);
        if (writer == null) {
            HttpResponse<String> res = HTTP.send(HttpRequest.newBuilder(URI.create(registry + "/schemas/ids/" + id)).build(),
                    HttpResponse.BodyHandlers.ofString());
            if (res.statusCode() != 200) {
                throw new IllegalStateException("registry: schema id " + id + " -> HTTP " + res.statusCode());
            }
            // {"schema": "<the Avro schema as a JSON string>", ...}
            String schemaJson = extractSchema(res.body());
            writer = new Schema.Parser().parse(schemaJson);
            SCHEMAS.put(id, writer);
        }
        GenericDatumReader<GenericRecord> reader = new GenericDatumReader<>(writer);
        return reader.read(null, DecoderFactory.get().binaryDecoder(payload, 5, payload.length - 5, null));
    }

    /** The "schema" member of the registry's JSON answer, unescaped (Jackson ships with Avro). */
    static String extractSchema(String body) throws Exception {
        com.fasterxml.jackson.databind.ObjectMapper m = new com.fasterxml.jackson.databind.ObjectMapper();
        return m.readTree(body).get("schema").asText();
    }

    private static String header(ConsumerRecord<?, ?> r, String name) {
        Header h = r.headers().lastHeader(name);
        return h == null ? "-" : new String(h.value(), StandardCharsets.UTF_8);
    }
}
