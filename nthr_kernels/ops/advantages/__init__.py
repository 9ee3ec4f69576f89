"""``nthr_advantages``: NTHR token advantages of a whole rollout batch. See README.md in this folder."""
