"""The hub's database: the store, its migrations, watermarks, device identities and clocks."""
