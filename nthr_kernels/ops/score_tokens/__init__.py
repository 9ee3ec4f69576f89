"""``score_tokens``: NTHR scores of one group from dense prediction errors. See README.md in this folder."""
