"""Training data: the episode store, the windows served from it, and the ways a store is made.

    store.py            EpisodeStore / EpisodeStoreWriter: memory-mapped frames, an episode index, statistics;
                        verify_store: every file against its checksum (`robovlms data verify`)
    windows.py          WindowDataset / window_loader: H past frames, each with its next L actions
    demonstrations.py   a benchmark's scripted experts, rolled out into a store (`robovlms data generate`)
    calvin_import.py    CALVIN's language-annotated windows into a store (`robovlms data import-calvin`)
    lerobot_import.py   LeRobot datasets (Parquet + MP4) into a store (`robovlms data import-lerobot`)
"""

from robovlms.data.store import Episode, EpisodeStore, EpisodeStoreWriter, FrameLayout, Statistics, verify_store


def __getattr__(name: str):
    """The windows on first use: they need torch, which reading a store (a simulator worker, a baseline) does not."""
    if name in ("WindowDataset", "window_loader"):
        from robovlms.data import windows

        return getattr(windows, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Episode", "EpisodeStore", "EpisodeStoreWriter", "FrameLayout", "Statistics", "WindowDataset",
           "verify_store", "window_loader"]
