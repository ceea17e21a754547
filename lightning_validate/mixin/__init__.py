"""``ValidationMixin``, the Lightning adapter that supplies exact, sync-free validation and test steps."""
