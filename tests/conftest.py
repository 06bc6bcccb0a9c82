"""Test layout: tests/unit needs nothing running; tests/integration shares one local Ray Serve app
(real vLLM engine, real weights), started once per session by the `app` fixture."""


def pytest_collection_modifyitems(config, items):
    # Tests that break the shared app on purpose (killing its engine) run after all others.
    items.sort(key=lambda item: item.get_closest_marker("destructive") is not None)


def pytest_configure(config):
    config.addinivalue_line("markers", "destructive: breaks the shared app on purpose; runs last")
