-- Risk scores are nearly every row of the audit log (one per entity per window; decisions,
-- outcomes and failures are rare), and every row written pays for every index it enters.
-- * (type, event_time) served the views of the rare types (decisions, outcomes, failures by
--   time); for scores it duplicated what (entity, event_time) and a scan of a month's partition
--   give. It now holds the rare types only; time ranges over all rows use a BRIN index (rows
--   arrive roughly in event-time order within a month's partition, so a block-range summary
--   narrows a scan for a small part of a B-tree's upkeep).
-- * (chain, seq) served only `foresight audit verify`, which reads every row anyway: it now
--   sorts them instead (1,000,000 rows: no slower, docs/benchmarks.md), and no row written
--   pays for the index.
-- Measured with COPY of 100,000 score rows (docs/benchmarks.md, audit log): the secondary
-- indexes' cost fell by about 40 %.
DROP INDEX IF EXISTS events_type_time;
DROP INDEX IF EXISTS events_chain_seq;
CREATE INDEX events_type_time ON events (type, event_time) WHERE type <> 'foresight.risk_score';
CREATE INDEX events_time_brin ON events USING brin (event_time);
