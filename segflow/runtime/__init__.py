"""segflow's shared I/O runtime.

The only package that imports confluent_kafka, fastavro, prometheus_client and talks to a
schema registry. Service cores never import it; service shells do.
"""
