import dagster as dg


class CorpusSourceResource(dg.ConfigurableResource):
    """Where the source corpus lives: a folder, glob or s3:// prefix (definitions.py wires
    SPECDRAFT_CORPUS); empty means the embedded demo corpus (written on first use). `eval_prompts`:
    a held-out prompt file for eval_report (same input formats; SPECDRAFT_EVAL_PROMPTS); empty means
    the corpus's own held-out rows."""

    location: str = ""
    eval_prompts: str = ""

    def resolved_location(self) -> str:
        if self.location:
            return self.location
        from training.demo.corpus import write_demo_corpus
        from training.paths import data_dir

        folder = data_dir() / "demo" / "corpus"
        if not any(folder.glob("*.jsonl")):
            write_demo_corpus(folder)
        return str(folder)

    def sources(self):
        from training.corpus import list_sources

        return list_sources(self.resolved_location())

    def source_for(self, shard: str):
        by_shard = {s.shard: s for s in self.sources()}
        if shard not in by_shard:
            raise dg.Failure(
                f"shard {shard!r} has no source file under {self.resolved_location()} "
                f"(found {sorted(by_shard)[:10]}); was the file removed?"
            )
        return by_shard[shard]
