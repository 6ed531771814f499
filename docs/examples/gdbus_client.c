/* pincache from C with GLib's GDBus: log in once and sign twice on one connection, or watch
 * cards come and go.
 *
 *   cc gdbus_client.c $(pkg-config --cflags --libs gio-2.0) -o gdbus_client
 *   ./gdbus_client sign TOKEN-LABEL KEY-ID-HEX < pin   # two ECDSA-SHA256 signatures, as hex,
 *                                                      # then the CacheCleared of the logout
 *   ./gdbus_client watch [SECONDS]                     # TokenInserted/TokenRemoved as they come
 *
 * The system bus, or PINCACHE_BUS_ADDRESS when set. A login lives as long as the bus
 * connection that made it (its cache environment), so everything below goes through ONE
 * GDBusConnection: the second Sign needs no PIN. The PIN is read from standard input, never
 * from the command line, and wiped once sent.
 *
 * A desktop application reacts to cards the way `watch` does: subscribe to Manager1's
 * TokenInserted and TokenRemoved on /org/pincache, read the token's properties (Label,
 * Present, Recognized, ...) and follow Token1's PropertiesChanged, since a card's label is
 * known only once its module has read it. A client that caches a login learns when and why
 * it ended from Manager1's CacheCleared(token, reason), sent to it alone (logout, timeout,
 * uses, removal, lock, suspend, flush, stale, policy): `sign` shows it after its Logout. */

#include <gio/gio.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DAEMON "org.pincache.Daemon"
#define MANAGER_PATH "/org/pincache"
#define MANAGER "org.pincache.Manager1"
#define TOKEN "org.pincache.Token1"
#define SESSION "org.pincache.Session1"

static GDBusConnection *open_bus(void) {
    GError *error = NULL;
    const char *address = getenv("PINCACHE_BUS_ADDRESS");
    GDBusConnection *bus =
        address && *address
            ? g_dbus_connection_new_for_address_sync(address,
                                                     G_DBUS_CONNECTION_FLAGS_AUTHENTICATION_CLIENT |
                                                         G_DBUS_CONNECTION_FLAGS_MESSAGE_BUS_CONNECTION,
                                                     NULL, NULL, &error)
            : g_bus_get_sync(G_BUS_TYPE_SYSTEM, NULL, &error);
    if (!bus) {
        fprintf(stderr, "cannot connect to the bus: %s\n", error->message);
        exit(3);
    }
    return bus;
}

/* One method call; on a D-Bus error prints its name (org.pincache.Error.PinIncorrect, ...)
 * and exits 1. */
static GVariant *call(GDBusConnection *bus, const char *path, const char *interface, const char *member,
                      GVariant *args, const char *reply_type) {
    GError *error = NULL;
    GVariant *reply = g_dbus_connection_call_sync(bus, DAEMON, path, interface, member, args,
                                                  reply_type ? G_VARIANT_TYPE(reply_type) : NULL,
                                                  G_DBUS_CALL_FLAGS_ALLOW_INTERACTIVE_AUTHORIZATION, 60000,
                                                  NULL, &error);
    if (!reply) {
        char *name = g_dbus_error_get_remote_error(error);
        fprintf(stderr, "%s failed: %s [%s]\n", member, error->message, name ? name : "?");
        exit(1);
    }
    return reply;
}

static GVariant *bytes(const guint8 *data, gsize length) {
    return g_variant_new_fixed_array(G_VARIANT_TYPE_BYTE, data, length, 1);
}

static char *token_label(GDBusConnection *bus, const char *path) {
    GVariant *reply = call(bus, path, "org.freedesktop.DBus.Properties", "Get", g_variant_new("(ss)", TOKEN, "Label"),
                           "(v)");
    GVariant *value;
    g_variant_get(reply, "(v)", &value);
    char *label = g_variant_dup_string(value, NULL);
    g_variant_unref(value);
    g_variant_unref(reply);
    return label;
}

static void on_cache_cleared(GDBusConnection *bus, const char *sender, const char *path, const char *interface,
                             const char *member, GVariant *parameters, gpointer user_data) {
    (void)bus, (void)sender, (void)path, (void)interface, (void)member;
    const char *token, *reason;
    g_variant_get(parameters, "(&o&s)", &token, &reason);
    printf("CacheCleared %s %s\n", token, reason);
    fflush(stdout);
    *(gboolean *)user_data = TRUE;
}

static int sign(const char *label, const char *key_hex) {
    gsize key_length = strlen(key_hex) / 2;
    guint8 key_id[128];
    if (key_length == 0 || key_length > sizeof key_id || strlen(key_hex) % 2) {
        fprintf(stderr, "bad key id\n");
        return 64;
    }
    for (gsize i = 0; i < key_length; i++) {
        unsigned int byte;
        if (sscanf(key_hex + 2 * i, "%2x", &byte) != 1) return 64;
        key_id[i] = (guint8)byte;
    }
    char pin[256];
    if (!fgets(pin, sizeof pin, stdin)) {
        fprintf(stderr, "no PIN on standard input\n");
        return 64;
    }
    pin[strcspn(pin, "\n")] = '\0';

    GDBusConnection *bus = open_bus();
    GVariant *tokens = call(bus, MANAGER_PATH, MANAGER, "GetTokens", NULL, "(ao)");
    GVariantIter *iter;
    const char *path;
    char *token = NULL;
    g_variant_get(tokens, "(ao)", &iter);
    while (!token && g_variant_iter_loop(iter, "&o", &path)) {
        char *l = token_label(bus, path);
        if (strcmp(l, label) == 0) token = g_strdup(path);
        g_free(l);
    }
    g_variant_iter_free(iter);
    g_variant_unref(tokens);
    if (!token) {
        fprintf(stderr, "no token labelled %s\n", label);
        return 1;
    }

    GVariant *opened = call(bus, token, TOKEN, "OpenSession", NULL, "(o)");
    char *session;
    g_variant_get(opened, "(o)", &session);
    g_variant_unref(opened);

    g_variant_unref(call(bus, session, SESSION, "Login", g_variant_new("(s)", pin), NULL));
    explicit_bzero(pin, sizeof pin); /* the daemon keeps it now, for this connection only */

    const char *messages[] = {"first message", "second message"};
    for (int i = 0; i < 2; i++) {
        GVariant *reply = call(bus, session, SESSION, "Sign",
                               g_variant_new("(@ays@ay)", bytes(key_id, key_length), "ECDSA-SHA256",
                                             bytes((const guint8 *)messages[i], strlen(messages[i]))),
                               "(ay)");
        GVariant *signature = g_variant_get_child_value(reply, 0);
        gsize n;
        const guint8 *sig = g_variant_get_fixed_array(signature, &n, 1);
        for (gsize j = 0; j < n; j++) printf("%02x", sig[j]);
        printf("\n");
        g_variant_unref(signature);
        g_variant_unref(reply);
    }
    /* Why the cached PIN went comes as a signal to this connection alone. */
    gboolean cleared = FALSE;
    guint subscription = g_dbus_connection_signal_subscribe(bus, DAEMON, MANAGER, "CacheCleared", MANAGER_PATH,
                                                            NULL, G_DBUS_SIGNAL_FLAGS_NONE, on_cache_cleared,
                                                            &cleared, NULL);
    g_variant_unref(call(bus, session, SESSION, "Logout", NULL, NULL));
    gint64 deadline = g_get_monotonic_time() + 5 * G_USEC_PER_SEC;
    while (!cleared && g_get_monotonic_time() < deadline) {
        if (!g_main_context_iteration(NULL, FALSE)) g_usleep(10000);
    }
    g_dbus_connection_signal_unsubscribe(bus, subscription);
    g_variant_unref(call(bus, session, SESSION, "Close", NULL, NULL));
    g_free(session);
    g_free(token);
    g_object_unref(bus);
    return 0;
}

static void on_token_signal(GDBusConnection *bus, const char *sender, const char *path, const char *interface,
                            const char *member, GVariant *parameters, gpointer user_data) {
    (void)sender, (void)path, (void)interface, (void)user_data;
    const char *token;
    g_variant_get(parameters, "(&o)", &token);
    if (strcmp(member, "TokenInserted") == 0) {
        /* The label may still be empty: the module reads the card after PC/SC reports it. */
        char *label = token_label(bus, token);
        printf("TokenInserted %s %s\n", token, label);
        g_free(label);
    } else {
        printf("TokenRemoved %s\n", token);
    }
    fflush(stdout);
}

static void on_properties_changed(GDBusConnection *bus, const char *sender, const char *path,
                                  const char *interface, const char *member, GVariant *parameters,
                                  gpointer user_data) {
    (void)bus, (void)sender, (void)interface, (void)member, (void)user_data;
    const char *changed_interface;
    GVariant *changed;
    g_variant_get(parameters, "(&s@a{sv}@as)", &changed_interface, &changed, NULL);
    GVariant *present = g_variant_lookup_value(changed, "Present", G_VARIANT_TYPE_BOOLEAN);
    if (strcmp(changed_interface, TOKEN) == 0 && present) {
        printf("Present %s %s\n", path, g_variant_get_boolean(present) ? "true" : "false");
        fflush(stdout);
    }
    if (present) g_variant_unref(present);
    g_variant_unref(changed);
}

static gboolean quit(gpointer loop) {
    g_main_loop_quit(loop);
    return G_SOURCE_REMOVE;
}

static int watch(int seconds) {
    GDBusConnection *bus = open_bus();
    g_dbus_connection_signal_subscribe(bus, DAEMON, MANAGER, "TokenInserted", MANAGER_PATH, NULL,
                                       G_DBUS_SIGNAL_FLAGS_NONE, on_token_signal, NULL, NULL);
    g_dbus_connection_signal_subscribe(bus, DAEMON, MANAGER, "TokenRemoved", MANAGER_PATH, NULL,
                                       G_DBUS_SIGNAL_FLAGS_NONE, on_token_signal, NULL, NULL);
    g_dbus_connection_signal_subscribe(bus, DAEMON, "org.freedesktop.DBus.Properties", "PropertiesChanged", NULL,
                                       TOKEN, G_DBUS_SIGNAL_FLAGS_NONE, on_properties_changed, NULL, NULL);
    /* The subscriptions are in place once the daemon has answered a call on this connection. */
    g_variant_unref(call(bus, MANAGER_PATH, MANAGER, "GetTokens", NULL, "(ao)"));
    printf("watching\n");
    fflush(stdout);
    GMainLoop *loop = g_main_loop_new(NULL, FALSE);
    if (seconds > 0) g_timeout_add_seconds(seconds, quit, loop);
    g_main_loop_run(loop);
    g_main_loop_unref(loop);
    g_object_unref(bus);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "sign") == 0) return sign(argv[2], argv[3]);
    if ((argc == 2 || argc == 3) && strcmp(argv[1], "watch") == 0) return watch(argc == 3 ? atoi(argv[2]) : 0);
    fprintf(stderr, "usage: %s sign TOKEN-LABEL KEY-ID-HEX < pin | %s watch [SECONDS]\n", argv[0], argv[0]);
    return 64;
}
