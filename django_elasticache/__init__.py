"""Django cache backend for Amazon ElastiCache (memcached) with auto discovery."""

__version__ = "2.0.0"
