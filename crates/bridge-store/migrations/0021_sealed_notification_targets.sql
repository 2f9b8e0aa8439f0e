-- A webhook or Slack target's URL can be a secret (a Slack incoming webhook's
-- path is its credential): the full URL is sealed in the credentials store
-- and referenced here, and `target` keeps only a redacted form to show.
-- Rows without a sealed target predate this and hold their URL in `target`.
ALTER TABLE notification_subscriptions ADD COLUMN sealed_target text;
