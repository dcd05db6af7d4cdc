"""FlowSAN Workbench: semi-adversarial networks for soft-biometric privacy of face images."""
__version__ = "0.1.0"
