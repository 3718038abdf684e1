"""The project's WSGI application."""

import os

from django.core.wsgi import get_wsgi_application

from .startup import warm_cache_if_asked

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
application = get_wsgi_application()
warm_cache_if_asked()
