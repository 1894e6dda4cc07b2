"""Models of the Gemma 2 / Gemma 3 / Mistral family, their configs and checkpoint loading."""
