"""
Views that use the cache as an application's do, for the tests that serve the project with
real servers (``test_servers.py``). Each answer names the process that served it.
"""

import os

from django.core.cache import cache
from django.http import HttpRequest, HttpResponse, JsonResponse


def signed(response: HttpResponse) -> HttpResponse:
    """The response, naming the process that served it."""
    response["X-Served-By"] = str(os.getpid())
    return response


def served(body: str, status: int = 200) -> HttpResponse:
    return signed(HttpResponse(body, status=status, content_type="text/plain"))


def recalled(value: str | None) -> HttpResponse:
    return served(value, 200) if value is not None else served("", 404)


def remember(request: HttpRequest, key: str) -> HttpResponse:
    cache.set(key, request.GET["value"])
    return served("stored")


def recall(request: HttpRequest, key: str) -> HttpResponse:
    return recalled(cache.get(key))


async def aremember(request: HttpRequest, key: str) -> HttpResponse:
    await cache.aset(key, request.GET["value"])
    return served("stored")


async def arecall(request: HttpRequest, key: str) -> HttpResponse:
    return recalled(await cache.aget(key))


def recall_after_marking(request: HttpRequest, mark: str, key: str) -> HttpResponse:
    """``recall``, once ``mark`` is stored: a test sees the request reach the cache."""
    cache.set(mark, "reached")
    return recalled(cache.get(key))


def recall_many(request: HttpRequest) -> HttpResponse:
    return signed(JsonResponse(cache.get_many(request.GET["keys"].split(","))))


def nodes(request: HttpRequest) -> HttpResponse:
    """The nodes this process's cache serves now."""
    return signed(JsonResponse({"nodes": sorted(cache.client_servers)}))
