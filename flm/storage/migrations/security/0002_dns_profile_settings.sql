-- DNS-01 credential profiles: the non-secret settings (server, zone, TSIG key name and
-- algorithm, API base URL, ...) as JSON. The secret itself never enters the database:
-- secret_ref says where it is (the OS keyring, or a 0600 file under the data directory).
ALTER TABLE dns_credentials ADD COLUMN settings_json TEXT NOT NULL DEFAULT '{}';
