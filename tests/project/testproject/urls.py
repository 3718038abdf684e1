from django.urls import path

from . import views

urlpatterns = [
    path("remember/<str:key>", views.remember),
    path("recall/<str:key>", views.recall),
    path("aremember/<str:key>", views.aremember),
    path("arecall/<str:key>", views.arecall),
    path("recall-after/<str:mark>/<str:key>", views.recall_after_marking),
    path("recall-many", views.recall_many),
    path("nodes", views.nodes),
]
