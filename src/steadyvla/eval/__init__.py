"""Closed-loop evaluation of a policy in MetaWorld v3 (`steadyvla eval`), also periodically during
training (`periodic.py`)."""
