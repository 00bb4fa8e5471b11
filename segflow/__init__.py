"""segflow: Kafka-native dynamic micro-segmentation for CRM retention."""

__version__ = "0.1.0"
