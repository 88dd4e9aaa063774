"""What comes back: bounces and complaints read from mailboxes into the journal."""
