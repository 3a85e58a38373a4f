"""compaction: the post-RL compaction pipeline (SFT -> RLVR -> OPSD).

The library layer: params schema, data, models, rollout engines, grading, tracking,
artifacts and the CLI. Jobs, tasks and flows build on it; it depends on none of them.
"""

__version__ = "0.1.0"
