"""The 2019 winners' tricks for long-tailed, fine-grained classes, each behind a flag:
class-aware losses (`losses`), class-aware sampling (`sampling`), hierarchy heads over the
product tree (`hierarchy`) and decoupled classifier re-training (`two_stage`)."""
