"""Who may call what, and how much: API keys and their scopes (`keys`), the per-request decision
taken from the request head (`gate`), per-key token buckets (`quota`) and the audit log (`audit`)."""
