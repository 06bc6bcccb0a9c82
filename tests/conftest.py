"""Test layout: tests/unit needs nothing running; tests/integration shares one local Ray Serve app
(real vLLM engine, real weights), started once per session by the `app` fixture."""


def pytest_collection_modifyitems(config, items):
    # Tests that load the shared app far beyond capacity (which skews the tiers' fitted latency
    # models that routing tests read) run after the others; those that break it on purpose
    # (killing its engine) run last.
    def rank(item) -> int:
        if item.get_closest_marker("destructive") is not None:
            return 2
        return 1 if item.get_closest_marker("disturbing") is not None else 0

    items.sort(key=rank)


def pytest_configure(config):
    config.addinivalue_line("markers", "disturbing: loads the shared app far beyond capacity; runs after the others")
    config.addinivalue_line("markers", "destructive: breaks the shared app on purpose; runs last")
