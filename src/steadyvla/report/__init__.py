"""After-the-fact views of a run dir: plots (`steadyvla plot`) and the end-of-run summary."""
