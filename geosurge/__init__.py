"""geosurge: distil, quantise, export and run GeoSURGE image geo-localisation on devices.

Importing ``geosurge`` imports nothing heavy: ``geosurge.geo`` and ``geosurge.runtime`` are numpy-only and run on a
device without torch; the model, training and export parts import torch when used.
"""
__version__ = "0.1.0"
