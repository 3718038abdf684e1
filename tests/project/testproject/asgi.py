"""The project's ASGI application."""

import os

from django.core.asgi import get_asgi_application

from .startup import warm_cache_if_asked

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
application = get_asgi_application()
warm_cache_if_asked()
