"""Drop-in integrations of the RLSD loss into RL training libraries (each needs its own optional extra)."""
