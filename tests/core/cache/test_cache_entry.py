from cache_factories import make_entry


def test_frequency_counts_uses_inside_the_sliding_window():
    """Frequency is the number of uses in (now - window, now]."""
    entry = make_entry("a", uses=[10.0, 50.0, 100.0, 200.0])
    assert entry.frequency(now=200.0, window_s=150.0) == 2
    assert entry.frequency(now=200.0, window_s=1000.0) == 4


def test_record_use_forgets_uses_older_than_the_window():
    """Recording a use drops the timestamps that fell out of the window and sets last_use."""
    entry = make_entry("a")
    for t in (0.0, 10.0, 20.0, 40.0):
        entry.record_use(t, window_s=25.0)
    assert list(entry.use_times) == [20.0, 40.0]
    assert entry.last_use == 40.0
