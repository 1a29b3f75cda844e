// _CFaultEngine
